import os
import sys

# tests/ holds helpers (random_program.py) imported by several test modules
sys.path.insert(0, os.path.dirname(__file__))
