"""Hits@k and MRR@k as an `evaluate` metric, for users who compute metrics through `evaluate`.

    import evaluate
    from vit_t5_dsi.training.hits_metric import RetrievalHits
    metric = RetrievalHits()                      # or evaluate.load("path/to/vit_t5_dsi/training/hits_metric.py")
    metric.add_batch(predictions=[[3, 1, 2]], references=[1])
    metric.compute(ks=[1, 10], mrr_k=10)          # {"hits@1": 0.0, "hits@10": 1.0, "mrr@10": 0.5}

Predictions are each query's ranked image positions (best first, -1 for an invalid or missing output),
references the gold position. The arithmetic is `vit_t5_dsi.training.metrics`; this class only adapts it.
"""

import datasets
import evaluate
import numpy as np

try:  # a package import, and `evaluate.load(<this file>)`, which loads it as a standalone module
    from .metrics import ranking_metrics
except ImportError:
    from vit_t5_dsi.training.metrics import ranking_metrics

_DESCRIPTION = ("Hits@k: the share of queries whose gold item is among the first k results. MRR@k: the mean of "
                "1/rank of the gold item within the first k (0 when absent). Every query counts; an invalid or "
                "duplicated output is a miss, and a duplicate keeps its first rank.")
_CITATION = """@inproceedings{tay2022transformer,
  title={Transformer Memory as a Differentiable Search Index},
  author={Tay, Yi and others}, booktitle={NeurIPS}, year={2022}}"""


class RetrievalHits(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION,
            inputs_description="predictions: list of ranked integer positions per query; references: gold position",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, ks=(1, 5, 10), mrr_k=10):
        width = max((len(p) for p in predictions), default=0)
        ranked = np.full((len(predictions), max(width, 1)), -1, dtype=np.int64)
        for row, prediction in enumerate(predictions):
            ranked[row, : len(prediction)] = prediction
        return ranking_metrics(ranked, np.asarray(references), ks, mrr_k)
