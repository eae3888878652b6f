from .hub_kernels import import_hub_kernels

import_hub_kernels()  # before any benchmark imports transformers (see hub_kernels.py)
