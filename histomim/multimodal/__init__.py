"""Genomic, radiology and histology (MIL) encoders, fusion operators and the fusion survival model."""
