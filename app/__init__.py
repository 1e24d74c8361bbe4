"""The browser page (``make app``, ``python -m app``): segment your own images and videos from a
few examples drawn on the page, with any checkpoint under exp/. An optional part of the package
(``pip install -e .[app]``): training, evaluation and predict.py never import it."""
