"""`python -m easyep_sglang.select`: statistics -> expert mask (the code is in easyep_sglang.core.selection).

This folder has no __init__.py on purpose: as a namespace package it never shadows the standard library's
`select` module for a script run from easyep_sglang/, as a select.py there would.
"""

from easyep_sglang.core.selection import main

main()
