"""Checks that drive our server with the stock tritonclient; run in a child pytest by ../test_tritonclient.py."""
