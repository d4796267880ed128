"""Explanations of the failed-vs-pristine classifiers: Grad-CAM maps and how to judge them."""
