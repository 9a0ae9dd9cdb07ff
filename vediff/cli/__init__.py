"""The command lines behind train.py and sample.py."""
