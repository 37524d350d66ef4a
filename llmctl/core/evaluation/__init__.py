"""Evaluation: judging a checkpoint on its task (`judging`), what it costs (`cost`), the records kept beside
it (`records`) and how they are shown (`report`). Every number llmctl prints about a checkpoint comes from here.
"""
