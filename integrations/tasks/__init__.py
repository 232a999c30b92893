"""One module per task (`task=eval|bench|export|npz|cache|mlperf`), eval.explain's breakdown and report, and the
multirun summary callback. Tasks reach the model, data and device only through an engine
(integrations/engines/)."""
