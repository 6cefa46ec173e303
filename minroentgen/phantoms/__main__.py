"""python -m minroentgen.phantoms: write a phantom data set or the grid of findings (see phantom.py)."""
from .phantom import main

main()
