from sensq.cli import main

main()
