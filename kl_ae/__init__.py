"""kl-ae: the command line and what the training and evaluation layers share (`common`), the bench, the recipes."""
