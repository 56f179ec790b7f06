"""`python -m easyep_sglang.accuracy`: score a served model's answers (the code is in easyep_sglang.eval.accuracy)."""

from easyep_sglang.eval.accuracy import main

if __name__ == "__main__":
    main()
