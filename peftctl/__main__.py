from peftctl.cli import app

app()
