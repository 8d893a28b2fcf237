"""Instruction data generation (self-instruct through an OpenAI-compatible teacher)."""
