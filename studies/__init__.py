"""Studies and checks of the method, outside the product packages: the demo's target, the study's assets."""
