"""``python -m agentlit`` (and ``torchrun -m agentlit``) run the CLI."""
from .cli import main

if __name__ == "__main__":
    main()
