"""`python -m jaxpaged.serve [--model DIR] [...]`: see `jaxpaged.serve.cli`."""
from jaxpaged.serve.cli import main

if __name__ == "__main__":  # not in the processes it spawns
    main()
