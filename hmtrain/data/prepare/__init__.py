"""`hmtrain data prepare`, stage by stage (pipeline.py runs them; work.py keeps what is finished)."""
