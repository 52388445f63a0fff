"""The paper's benchmark evaluations on real data formats (arXiv 2410.08209, section 4):
grounded conversation generation on GranDf (gcg.py) and referring expression
segmentation on RefCOCO/+/g (res.py)."""
