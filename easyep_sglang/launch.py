"""`python -m easyep_sglang.launch`: serve a model through SGLang with an expert mask or pruned (the code is in easyep_sglang.serving.launch)."""

from easyep_sglang.serving.launch import main

if __name__ == "__main__":
    main()
