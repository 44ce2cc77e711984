"""Run tracking: the MLflow tracker and its null twin (tracker.py), opening a tracking store safely
(store.py), and passwords kept out of URLs (credentials.py). ``python -m sweeper.sync`` sends what
runs kept while the store was down."""
