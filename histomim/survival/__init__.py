"""Survival labels from pandas, losses, sksurv metrics, the sklearn-compatible estimator and plots."""
