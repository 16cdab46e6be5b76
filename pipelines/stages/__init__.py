"""One module per stage: pretrain, curvature, finetune, evaluate, gate."""
