"""What runs inside one trial: models, data, pruners, retraining schedules and the train loop."""
