"""The offline identification pipeline: sample, label, features, fit, evaluate."""
