"""The commands behind train.py, test.py and predict.py: each parses its arguments and calls
into engine/."""
