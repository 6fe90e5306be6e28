"""Forecasting a patient's future with a pretrained EHRMamba: sampled continuations of the token sequence
(``generate``), readable rows for people (``render``), and a next-visit recall benchmark against a frequency
baseline (``evaluate``)."""
