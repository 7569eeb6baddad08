"""Recall-focused evaluation of similar-case retrieval: metrics, baselines, calibrated thresholds, report.

    from medsim.evaluate import metrics               # pure numpy metrics on (scores, relevant, valid) matrices
    from medsim.evaluate import EvaluationConfig, run_evaluation   # `medsim evaluate`

See docs/evaluation.md.
"""

from medsim.evaluate import metrics
from medsim.evaluate.data import EvalItem, EvalSet, load_eval_set

__all__ = ["EvalItem", "EvalSet", "EvaluationConfig", "load_eval_set", "metrics", "run_evaluation"]


def __getattr__(name):  # the runner pulls in matplotlib and the methods; import it only when asked for
    if name in ("EvaluationConfig", "run_evaluation"):
        from medsim.evaluate import runner

        return getattr(runner, name)
    raise AttributeError(name)
