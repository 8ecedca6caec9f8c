"""``python -m breastcnn`` runs the CLI."""

from breastcnn.cli.app import main

if __name__ == "__main__":
    main()
