from easyep_sglang.demo.server import main

main()
