"""`python -m easyep_sglang.mask`: check a mask against a model, or import the reference code's 0/1 matrix (the code is in easyep_sglang.core.mask)."""

from easyep_sglang.core.mask import main

if __name__ == "__main__":
    main()
