"""python -m app [--host H] [--port P] [--checkpoint CKPT ...]: app/server.py says more."""
from app.server import main
from util.cli import run

if __name__ == "__main__":
    run(main, prog="app")
