from peftctl.cli.commands import app

app()
