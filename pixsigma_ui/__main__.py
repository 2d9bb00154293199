"""``python -m pixsigma_ui [flags]``: serve the web app (pixsigma_ui/server.py; flags as ``python app.py``)."""

from pixsigma_ui.server import main

if __name__ == "__main__":
    main(prog="python -m pixsigma_ui")
