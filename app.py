"""The web app from a clone: ``python app.py [flags]`` (the same as ``pixsigma app`` and ``python -m pixsigma_ui``).

The app lives in the package (pixsigma_ui/server.py); flags: ``python app.py --help``, docs/app.md.
"""

from pixsigma_ui.server import main

if __name__ == "__main__":
    main()
