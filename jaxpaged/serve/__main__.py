"""`python -m jaxpaged.serve [--model DIR] [...]`: see `jaxpaged.serve.cli`."""
from jaxpaged.serve.cli import main

main()
