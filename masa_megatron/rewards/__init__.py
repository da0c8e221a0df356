"""Rewards: solution grading (`math`), meta-prediction parsing and reward (`meta`), and a registry
of reward functions (`registry`). No torch imports here."""
