"""Pure selection math (numpy only; no Ray, no torch, no stage): LP and the baselines' metrics
(metrics.py), the selection methods, each declared once (methods.py), and the cluster-stratified
chunking that turns a method's sort key into a selection (strategies.py). The select stage
(rayapp/stages/select/) reads the inputs and writes the outputs around it."""
