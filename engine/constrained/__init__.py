"""Constrained decoding: llguidance grammars (`grammar.py`), a reasoning block before the answer's
grammar (`think.py`), and closing a constrained sample within its token budget (`closing.py`)."""
