import os
import sys

# tests/ holds helpers (spec_ref.py) imported by several test modules
sys.path.insert(0, os.path.dirname(__file__))
