/* 64-bit entry of the test guest, as Linux's startup_64: long mode, RSI = boot_params. */
    .section .text.start, "ax"
    .globl _start
    .code64
_start:
    cli
    lea stack_top(%rip), %rsp
    mov %rsi, %rdi          /* boot_params -> first C argument */
    call guest_main
1:  cli
    hlt
    jmp 1b

    .section .bss
    .balign 16
stack:
    .skip 16384
stack_top:
