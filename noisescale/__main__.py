from noisescale.app.cli import run

run()
