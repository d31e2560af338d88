"""Task records, the synthetic multi-domain task generator and the scoring metrics."""
