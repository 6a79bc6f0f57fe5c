"""Measuring the tracker and the rules against ground truth (`edgecv eval`, `edgecv variants`,
`edgecv bench trackers`). Needs the ``eval`` extra (motmetrics) for the tracking metrics."""
