"""The CKKS cloud worker: computes analytics blind, holding the public context only."""
