"""Evaluation: perplexity and bits per character, multiple-choice accuracy, pairwise LLM-as-judge."""
