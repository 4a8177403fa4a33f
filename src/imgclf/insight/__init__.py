"""Seeing the model and the data: the training report and the data audit.

``report`` draws a trained model's curves, confusion matrix, calibration and
top losses; ``audit`` finds duplicates, leaks, label errors and odd images in
a folder. Both write one offline HTML page. Nothing here is imported by
``import imgclf``; matplotlib is imported only in ``plots``.
"""
