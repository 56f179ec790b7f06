"""`python -m easyep_sglang.demo_model`: build a deterministic tiny random checkpoint (the code is in easyep_sglang.demo.tiny_models)."""

from easyep_sglang.demo.tiny_models import main

if __name__ == "__main__":
    main()
