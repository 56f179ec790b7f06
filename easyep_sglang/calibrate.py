"""`python -m easyep_sglang.calibrate`: record per-expert statistics on domain prompts (the code is in easyep_sglang.serving.calibrate)."""

from easyep_sglang.serving.calibrate import main

if __name__ == "__main__":
    main()
