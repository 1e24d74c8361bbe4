"""Segment your own images or video: python predict.py --help; commands/predict.py says more."""
from commands.predict import main
from util.cli import run

if __name__ == "__main__":
    run(main)
