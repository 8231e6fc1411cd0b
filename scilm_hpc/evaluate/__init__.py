"""Evaluation: metrics (classification, entity-level NER, perplexity), sharded evaluation
over ranks, reports and plots."""
