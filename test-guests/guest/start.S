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

/*
 * AP trampoline, copied by the BSP to physical 0x6000 (SIPI vector 0x06). An AP starts here in
 * real mode at CS=0x600, IP=0: it records its APIC id (CPUID.1:EBX[31:24]) in the bitmap at
 * 0x6ff4, counts itself in at 0x6ff0 and halts.
 */
    .section .rodata
    .globl ap_tramp_start, ap_tramp_end
    .code16
ap_tramp_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov $1, %eax
    cpuid
    shr $24, %ebx
    lock btsl %ebx, 0x6ff4
    lock incw 0x6ff0
1:  hlt
    jmp 1b
ap_tramp_end:
    .code64
