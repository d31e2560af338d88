"""The top floor of the distribution: the `cotune` command (cotune.cli) and the demo
(cotune.demo). Nothing below imports from here."""
